"""The command-line parser every entry point uses: a usage error is one line, like any other."""

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
