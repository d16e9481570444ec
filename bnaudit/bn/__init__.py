"""BatchNorm layer discovery, mergeable statistics, per-layer health, the pickle-global policy."""
