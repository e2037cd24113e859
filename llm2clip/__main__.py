"""``python -m llm2clip`` = the ``llm2clip`` command."""

from llm2clip.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
