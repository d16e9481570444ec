"""Standard-library callables that are not on a deny-list but run code, start processes or write files.

Each case is a real torch.save checkpoint whose data.pkl calls the callable before rebuilding the state
dict; every payload only creates the marker file.
"""

from __future__ import annotations

import marshal

from tests.security.corpus.callable_case import TOUCH, attr, in_zip
from tests.security.corpus.ops import (
    TRUE,
    call,
    dct,
    glob,
    integer,
    lst,
    raw_bytes,
    stack_glob,
    system_call,
    text,
    touch_command,
    touch_source,
    whole,
)


@in_zip("os.spawnve", ("os.spawnve", "posix.spawnve"))
def _spawnve(m: str) -> bytes:
    return call(glob("os", "spawnve"), integer(0), text(TOUCH), lst(text("touch"), text(m)), dct())


@in_zip("os.posix_spawn", ("os.posix_spawn", "posix.posix_spawn"))
def _posix_spawn(m: str) -> bytes:
    return call(glob("os", "posix_spawn"), text(TOUCH), lst(text("touch"), text(m)), dct())


@in_zip("doctest.debug_script", ("doctest.debug_script",))
def _debug_script(m: str) -> bytes:
    return call(glob("doctest", "debug_script"), text(touch_source(m)), TRUE)  # pm=True: a plain exec


@in_zip("logging.config.dictConfig-factory", ("logging.config.dictConfig",))
def _dict_config(m: str) -> bytes:
    factory = dct(**{"()": text("builtins.open"), "file": text(m), "mode": text("w")})
    return call(glob("logging.config", "dictConfig"), dct(version=integer(1), filters=dct(f=factory)))


@in_zip("codecs.open", ("codecs.open",))
def _codecs_open(m: str) -> bytes:
    return call(glob("codecs", "open"), text(m), text("w"))


@in_zip("io.FileIO", ("io.FileIO", "_io.FileIO"))
def _file_io(m: str) -> bytes:
    return call(glob("io", "FileIO"), text(m), text("w"))


@in_zip("_operator.attrgetter", ("_operator.attrgetter", "torch.serialization.os"))
def _attrgetter(m: str) -> bytes:
    return system_call(m, attr(glob("torch.serialization", "os"), "system"))


@in_zip("_functools.partial", ("_functools.partial", "io.FileIO"))
def _partial(m: str) -> bytes:
    return call(call(glob("_functools", "partial"), glob("io", "FileIO"), text(m), text("w")))


@in_zip("_frozen_importlib.__import__", ("_frozen_importlib.__import__",))
def _frozen_import(m: str) -> bytes:
    return system_call(m, attr(call(glob("_frozen_importlib", "__import__"), text("os")), "system"))


@in_zip("pkgutil.resolve_name", ("pkgutil.resolve_name",))
def _resolve_name(m: str) -> bytes:
    return system_call(m, call(glob("pkgutil", "resolve_name"), text("os:system")))


@in_zip("idlelib.calltip.get_entity", ("idlelib.calltip.get_entity",), requires=("idlelib",))
def _idlelib(m: str) -> bytes:
    return call(glob("idlelib.calltip", "get_entity"), text(touch_source(m)))


@in_zip("lib2to3.Grammar.loads", ("lib2to3.pgen2.grammar.Grammar.loads",), protocol=4, requires=("lib2to3",))
def _lib2to3(m: str) -> bytes:
    grammar = call(glob("lib2to3.pgen2.grammar", "Grammar"))
    nested = raw_bytes(whole(system_call(m)))
    return call(stack_glob("lib2to3.pgen2.grammar", "Grammar.loads"), grammar, nested)


@in_zip("bdb.Bdb.run", ("bdb.Bdb.run", "bdb.Bdb"), protocol=4)
def _bdb(m: str) -> bytes:
    return call(stack_glob("bdb", "Bdb.run"), call(glob("bdb", "Bdb")), text(touch_source(m)))


@in_zip("cProfile.runctx", ("cProfile.runctx",))
def _cprofile(m: str) -> bytes:
    return call(glob("cProfile", "runctx"), text(touch_source(m)), dct(), dct())


@in_zip("distutils.file_util.write_file", ("distutils.file_util.write_file",), requires=("distutils",))
def _write_file(m: str) -> bytes:
    return call(glob("distutils.file_util", "write_file"), text(m), lst(text("x")))


@in_zip("shutil.copyfile", ("shutil.copyfile",))
def _copyfile(m: str) -> bytes:
    return call(glob("shutil", "copyfile"), text("/dev/null"), text(m))


@in_zip("marshal.loads+FunctionType", ("marshal.loads", "types.FunctionType"))
def _marshal(m: str) -> bytes:
    code = marshal.dumps(compile(touch_source(m), "<payload>", "exec"))
    function = call(glob("types", "FunctionType"), call(glob("marshal", "loads"), raw_bytes(code)), dct())
    return call(function)


@in_zip("_pickle.loads-nested", ("_pickle.loads",), protocol=3)
def _nested(m: str) -> bytes:
    return call(glob("_pickle", "loads"), raw_bytes(whole(system_call(m))))


@in_zip("_operator.methodcaller", ("_operator.methodcaller", "torch.serialization.os"))
def _methodcaller(m: str) -> bytes:
    caller = call(glob("_operator", "methodcaller"), text("system"), text(touch_command(m)))
    return call(caller, glob("torch.serialization", "os"))


@in_zip("pydoc.locate", ("pydoc.locate",))
def _locate(m: str) -> bytes:
    return system_call(m, call(glob("pydoc", "locate"), text("os.system")))


@in_zip("pydoc.pipepager", ("pydoc.pipepager",))
def _pipepager(m: str) -> bytes:
    return call(glob("pydoc", "pipepager"), text(""), text(touch_command(m)))


@in_zip("uuid._get_command_stdout", ("uuid._get_command_stdout",))
def _uuid(m: str) -> bytes:
    return call(glob("uuid", "_get_command_stdout"), text("touch"), text(m))


@in_zip("imaplib.IMAP4_stream", ("imaplib.IMAP4_stream",))
def _imap(m: str) -> bytes:
    return call(glob("imaplib", "IMAP4_stream"), text(touch_command(m)))


@in_zip("timeit.timeit", ("timeit.timeit",))
def _timeit(m: str) -> bytes:
    return call(
        glob("timeit", "timeit"),
        text(touch_source(m)),
        text("pass"),
        glob("time", "perf_counter"),
        integer(1),
    )


@in_zip("code.InteractiveInterpreter.runcode", ("code.InteractiveInterpreter",), protocol=4)
def _runcode(m: str) -> bytes:
    interpreter = call(glob("code", "InteractiveInterpreter"))
    return call(stack_glob("code", "InteractiveInterpreter.runcode"), interpreter, text(touch_source(m)))


@in_zip("profile.run", ("profile.run",))
def _profile(m: str) -> bytes:
    return call(glob("profile", "run"), text(touch_source(m)))


@in_zip("logging.FileHandler", ("logging.FileHandler",))
def _file_handler(m: str) -> bytes:
    return call(glob("logging", "FileHandler"), text(m))
