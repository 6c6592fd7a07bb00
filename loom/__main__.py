from loom._import_path import drop_working_directory

# `python -m loom` put the working directory first on sys.path; a folder there must not shadow
# installed packages in Loom's processes (see loom/_import_path.py). Before anything else imports.
drop_working_directory()

from loom.cli import main  # noqa: E402

raise SystemExit(main())
