"""``python -m launch status|tail|cancel JOB_FOLDER`` — follow and stop jobs submitted by ``launch.submit``."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from launch.job_folder import JobFolder


def _status(jf: JobFolder, console: Console) -> None:
    t = Table(title=f"{jf.record['name']} ({jf.cluster}, submitted {jf.record['submitted']})")
    for col in ("job", "run", "state", "requeues", "step", "loss", "tokens/s"):
        t.add_column(col)
    for j in jf.jobs():
        m = j.last or {}
        loss = m.get("loss")
        tps = m.get("tokens_per_s")
        t.add_row(j.job_id, j.tag, j.state, str(j.restarts), str(m.get("step", "-")),
                  f"{loss:.4f}" if isinstance(loss, float) else "-", f"{tps:,.0f}" if isinstance(tps, float) else "-")
    console.print(t)


def _tail(jf: JobFolder, lines: int, follow: bool, err: bool) -> None:
    infos = jf.jobs()
    pos = {}
    for j in infos:
        p = j.stderr if err else j.stdout
        print(f"==> {j.job_id} ({j.tag}) {p} <==")
        text = p.read_text(errors="replace") if p.exists() else ""
        print("\n".join(text.splitlines()[-lines:]))
        pos[p] = len(text)
    while follow:  # ctrl-c to stop
        time.sleep(2)
        for p, n in pos.items():
            if p.exists() and p.stat().st_size > n:
                with open(p, errors="replace") as f:
                    f.seek(n)
                    chunk = f.read()
                pos[p] = n + len(chunk)
                sys.stdout.write(chunk)
                sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("status", "state, requeues and latest step/loss of every job"),
                        ("tail", "last lines of each job's rank-0 log"), ("cancel", "cancel every job")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("folder", help="job folder printed by launch.submit")
        if name == "tail":
            s.add_argument("-n", "--lines", type=int, default=20)
            s.add_argument("-f", "--follow", action="store_true")
            s.add_argument("--err", action="store_true", help="stderr instead of stdout (logs, progress bars)")
    args = p.parse_args(argv)
    try:
        jf = JobFolder(args.folder)
    except FileNotFoundError as e:
        p.error(str(e))
    if args.cmd == "status":
        _status(jf, Console())
    elif args.cmd == "tail":
        try:
            _tail(jf, args.lines, args.follow, args.err)
        except KeyboardInterrupt:
            pass
    else:
        ids = jf.cancel()
        print(f"cancelled: {', '.join(ids) or 'nothing (no live job)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
