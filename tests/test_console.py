"""`jupyter console` driven through a real pty, in its full prompt_toolkit mode: a multi-line
cell is only sent when the kernel's is_complete says it is finished."""

import os
import re
import sys
from pathlib import Path

import pexpect

PROMPT = re.compile(r"In \[(?:\x1b\[[0-9;?]*[A-Za-z])*\d+")


def test_console_runs_a_multiline_cell():
    jupyter = str(Path(sys.executable).parent / "jupyter")
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm")
    child = pexpect.spawn(
        jupyter,
        [
            "console",
            "--kernel",
            "parallax",
            "--colors=NoColor",
        ],
        env=env,
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 120),
    )
    try:
        child.expect(PROMPT)
        child.sendline("let base = 10;")
        child.expect(PROMPT)
        # Each Enter asks the kernel whether the cell is complete; the open block keeps the
        # console collecting lines until the closing brace.
        child.sendline("for i in 0..3 {")
        child.sendline('    println!("line {}", base * i);')
        child.sendline("}")
        child.expect("line 0")
        child.expect("line 10")
        child.expect("line 20")
        child.expect(PROMPT)
        child.sendline("base * 4 + 2")
        child.expect(r"Out\[(?:\x1b\[[0-9;?]*[A-Za-z])*\d+(?:\x1b\[[0-9;?]*[A-Za-z])*\]:")
        child.expect("42")
        child.expect(PROMPT)
    finally:
        child.sendcontrol("d")
        child.expect("really want to exit", timeout=30)
        child.sendline("y")
        child.expect(pexpect.EOF, timeout=30)
        child.close()
