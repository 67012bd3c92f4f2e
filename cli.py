"""The ``ats`` command in a checkout: ``python cli.py COMMAND`` runs ``ats.cli`` (installed, the
``ats`` entry point does)."""
from ats.cli import main

if __name__ == "__main__":
    main()
