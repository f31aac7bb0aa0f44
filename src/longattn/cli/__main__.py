"""``python -m longattn.cli``: the ``longattn`` command line."""

from longattn.cli import app

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="longattn")
