"""Our own source read as syntax trees, for the tests that check the code itself (the layers, the catalogue)."""
import ast
import gc
import threading


def parse(path) -> ast.Module:
    """``ast.parse`` of a file. CPython 3.11's AST constructor can raise a spurious SystemError ("AST constructor
    recursion depth mismatch", python/cpython#106905, fixed in later releases) when its thread's recursion count is
    disturbed while it runs (a collection's finalizers, of which the suite leaves many) or was left off by earlier code:
    the collector is paused while it parses, and a parse that still meets that error is done again in a thread of its
    own, whose count starts clean."""
    text = path.read_text(encoding="utf-8")
    enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            return ast.parse(text, filename=str(path))
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("tree", ast.parse(text, filename=str(path))))
        thread.start()
        thread.join()
        return result["tree"]
    finally:
        if enabled:
            gc.enable()
