"""llmctl with no command: an interactive shell, as supervisorctl has.

Each line is an llmctl command line (`status`, `tail -f qwen`, `--json status`, …) run over one
connection; errors are printed and the shell goes on. `help` lists the commands, `exit`, `quit` or
end of input leaves. ^C stops the command running (a follow, a stream), not the shell.
"""

from __future__ import annotations

import argparse
import cmd
import contextlib
import shlex
import sys
from typing import Callable, TextIO

PROMPT = "llmctl> "


class Shell(cmd.Cmd):
    prompt = PROMPT
    intro = "llmctl shell: `help` lists the commands, `exit` leaves."

    def __init__(self, parser: argparse.ArgumentParser, execute: Callable[[argparse.Namespace], int],
                 stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = stdin is sys.stdin  # readline's editing and history where it is a terminal
        self.parser = parser
        self.execute = execute
        self.status = 0

    def emptyline(self) -> bool:
        return False  # cmd.Cmd would repeat the last command: not for `restart`

    def default(self, line: str) -> bool:
        if line.strip() in ("exit", "quit", "EOF"):
            if line.strip() == "EOF":
                self.stdout.write("\n")
            return True
        try:
            words = shlex.split(line)
        except ValueError as e:
            self.stdout.write(f"llmctl: {e}\n")
            return False
        if words[:1] == ["help"]:
            self.parser.print_help(self.stdout) if len(words) == 1 else self._help(words[1])
            return False
        try:
            args = self.parser.parse_args(words)
        except SystemExit:  # argparse has printed what was wrong
            return False
        if args.command is None:
            self.stdout.write("llmctl: give a command (`help` lists them)\n")
            return False
        try:
            self.status = self.execute(args)
        except KeyboardInterrupt:
            self.stdout.write("\n")
        return False

    def _help(self, command: str) -> None:
        with contextlib.suppress(SystemExit):
            self.parser.parse_args([command, "--help"])

    # cmd.Cmd dispatches `help` and `EOF` to methods of their own: send them through default().
    def onecmd(self, line: str) -> bool:
        return self.default(line) if line.strip() else self.emptyline()
