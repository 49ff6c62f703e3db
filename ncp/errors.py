import os
import sys


class NcpError(ValueError):
    """Bad input or configuration; the message names the file, row or key at fault."""


def run_cli(main) -> None:
    """Run a command's main(): a user error (NcpError) ends in one `error: ...` line and exit code 2, Ctrl-C
    outside the training loop in exit code 130; anything unexpected keeps its traceback."""
    try:
        main()
    except NcpError as e:
        message = str(e)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: torch wraps it in the worker's traceback
            message = message.strip().splitlines()[-1].removeprefix(f"{NcpError.__module__}.NcpError: ")
        message = " ".join(line.strip() for line in message.splitlines())  # libraries' messages may span lines
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
