"""`python -m pixiebox.cli`: the same as the `pixiebox` command."""

from pixiebox.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
