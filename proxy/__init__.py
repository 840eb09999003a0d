"""Faultline: a reverse proxy that says who produced every response and where the fault lies."""

__version__ = "0.1.0"


def compiled() -> bool:
    """True when the per-exchange modules run compiled by mypyc (setup.py, FAULTLINE_COMPILE=1),
    False when they run as the interpreted sources."""
    from . import forward

    return not (forward.__file__ or "").endswith(".py")


def stale_compiled() -> list[str]:
    """Sources edited after their compiled copy was built next to them in a work tree
    (`FAULTLINE_COMPILE=1 pip install -e .`): Python imports the copy, so the edit does not
    run. An installed wheel's files are never edited and are not checked."""
    import sysconfig
    from pathlib import Path

    here = Path(__file__).resolve().parent
    paths = sysconfig.get_paths()
    if any(here.is_relative_to(Path(paths[k]).resolve()) for k in ("purelib", "platlib")):
        return []
    stale = []
    for library in here.glob("*.so"):
        source = here / (library.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > library.stat().st_mtime:
            stale.append(source.name)
    return sorted(stale)
