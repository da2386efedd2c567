"""STAND-IN for the OpenBSD installer on a serial console (tests only; no OpenBSD media here).

    python openbsd_transcript_player.py TRANSCRIPT ANSWERS_LOG

Prints TRANSCRIPT with CRLF line ends like a serial console. At each "@@READ" line it stops
after the preceding prompt (no newline), reads one line from stdin like the installer's `read`,
appends it to ANSWERS_LOG and echoes it. It then goes on; at the end it exits (console EOF).
"""
import sys

path, log_path = sys.argv[1], sys.argv[2]
lines = open(path, encoding="utf-8", newline="").read().split("\n")   # keep bare CRs
if lines and lines[-1] == "":
    lines.pop()
out = sys.stdout
with open(log_path, "w", encoding="utf-8") as log:
    for i, line in enumerate(lines):
        if line == "@@READ":
            answer = sys.stdin.readline().rstrip("\r\n")
            log.write(answer + "\n")
            log.flush()
            out.write(answer + "\r\n")
            out.flush()
            continue
        prompt_next = i + 1 < len(lines) and lines[i + 1] == "@@READ"
        out.write(line if prompt_next else line + "\r\n")
        out.flush()
