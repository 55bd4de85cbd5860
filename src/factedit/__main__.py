"""``python -m factedit``: the ``factedit`` command; also what ``torchrun -m factedit ...`` starts on each rank."""

from factedit.cli.main import app

if __name__ == "__main__":
    app(prog_name="factedit")
