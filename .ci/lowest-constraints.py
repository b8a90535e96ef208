"""Pin every runtime dependency to the floor that setup.cfg declares.

    python .ci/lowest-constraints.py [OUT]   write a pip constraints file (default: stdout)
    python .ci/lowest-constraints.py --check  fail unless the installed versions are those floors

setup.cfg's ``install_requires`` is the one list of floors: this script derives the
"lowest versions" job (.ci/run and ``tox -e lowest``) from it, so a floor cannot be raised
or lowered without the suite being run at it.  Every runtime dependency must declare a
``>=`` floor; one without is an error, not a silently unpinned package.
Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"
# "name[extras] >=1.2, <2 ; marker"  (PEP 508 without URLs, which install_requires never uses here)
_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<specs>[^;]*)(?P<marker>;.*)?$"
)


def floors() -> list[tuple[str, str, str]]:
    """(name, floor version, environment marker or "") for each runtime dependency."""
    cfg = configparser.ConfigParser(interpolation=None)
    if not cfg.read(SETUP_CFG):
        raise SystemExit(f"cannot read {SETUP_CFG}")
    out = []
    for line in cfg["options"]["install_requires"].splitlines():
        line = line.strip()
        if not line:
            continue
        m = _REQUIREMENT.match(line)
        if m is None:
            raise SystemExit(f"setup.cfg: cannot parse requirement {line!r}")
        lows = [s.strip()[2:].strip() for s in m["specs"].split(",") if s.strip().startswith(">=")]
        if len(lows) != 1:
            raise SystemExit(f"setup.cfg: {line!r} needs exactly one '>=' floor")
        out.append((m["name"], lows[0], (m["marker"] or "").strip()))
    return out


def _release(v: str) -> str:
    """'4.4' and '4.4.0' name one release (PEP 440); compare without trailing zeros."""
    parts = v.split(".")
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return ".".join(parts)


def check() -> int:
    """Compare what is installed with the floors (the proof that the job ran at them)."""
    from importlib.metadata import PackageNotFoundError, version

    bad = 0
    for name, low, marker in floors():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "not installed"
        ok = _release(have) == _release(low) or (marker != "" and have == "not installed")
        print(f"{name:<14} floor {low:<10} installed {have}{'' if ok else '   <-- MISMATCH'}")
        bad += not ok
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        return check()
    text = "".join(f"{name}=={low}{' ' + marker if marker else ''}\n" for name, low, marker in floors())
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
