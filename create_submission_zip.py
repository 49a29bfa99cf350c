"""Make assignment_code.zip with every source file the solution needs, and prove it complete.

    python create_submission_zip.py          # asks before replacing an existing zip (in a terminal)
    python create_submission_zip.py --yes    # never asks
The zip holds the scripts, shared modules, the Colab notebook, tests, requirements and README; never data,
checkpoints, results, plots or caches. It is then unpacked into a temporary folder and every
module is imported from there, so a file the code needs but the zip lacks is caught now.
"""
import argparse
import io
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import utils

ZIP_NAME = "assignment_code.zip"
PATTERNS = ("*.py", "*.ipynb", "*.md", "requirements*.txt", "pytest.ini", "pyproject.toml", "tests/*.py", "slurm/*")


def source_files(root):
    """The files that go into the zip, relative to root, sorted."""
    root = pathlib.Path(root)
    files = {path.relative_to(root) for pattern in PATTERNS for path in root.glob(pattern) if path.is_file()}
    return sorted(files)


def zip_bytes(root, files):
    """The zip of `files` (relative to root), made in memory (a few hundred kB): nothing is written until it is
    checked, and then at once (utils.save_bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(pathlib.Path(root) / file, file.as_posix())
    return buffer.getvalue()


def check_zip(path):
    """Unpack the zip (a path, or a file object) into a temporary folder and import every module from there.

    Returns None, or (missing module, the module that imports it).
    """
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(folder)
            modules = sorted(pathlib.Path(name).stem for name in archive.namelist()
                             if name.endswith(".py") and "/" not in name)
        # -I: the unpacked folder alone is on the path, not this one nor PYTHONPATH.
        probe = ("import importlib, sys\n"
                 f"sys.path.insert(0, {folder!r})\n"
                 f"for name in {modules!r}:\n"
                 "    try:\n"
                 "        importlib.import_module(name)\n"
                 "    except ModuleNotFoundError as error:\n"
                 "        sys.exit(f'missing: {error.name} {name}')\n")
        result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=folder, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    last = (result.stderr.strip().splitlines() or [""])[-1]
    if not last.startswith("missing: "):
        raise utils.UserError(f"a module of the unpacked zip fails to import: {last}")
    missing, importer = last.removeprefix("missing: ").split()
    return missing, importer


def main(argv=()):
    """Write and check the zip; `argv` as on the command line."""
    parser = argparse.ArgumentParser(prog="create_submission_zip.py", description=__doc__,
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("--yes", action="store_true", help="replace an existing zip without asking")
    parser.add_argument("--output", default=ZIP_NAME, help="the zip to write")
    args = parser.parse_args(argv)
    root = pathlib.Path(__file__).resolve().parent
    output = pathlib.Path(args.output)
    if output.exists() and not args.yes and sys.stdin.isatty():
        if input(f"'{output}' exists; replace it? [y/N] ").strip().lower() not in ("y", "yes"):
            raise utils.UserError(f"kept '{output}' as it was")
    files = source_files(root)
    data = zip_bytes(root, files)
    problem = check_zip(io.BytesIO(data))
    if problem:
        missing, importer = problem
        if not (root / f"{missing.split('.')[0]}.py").exists() and not (root / missing.split(".")[0]).is_dir():
            raise utils.UserError(f"{importer}.py needs the package '{missing}', which is not installed: "
                                  "pip install -r requirements.txt")
        raise utils.UserError(f"the zip would lack {missing}, which {importer}.py imports: make it a .py "
                              f"file next to the scripts (the zip takes {', '.join(PATTERNS)})")
    utils.save_bytes(data, output)
    print(f"saved {output}: {len(files)} files, every module imports from the unpacked zip")
    for file in files:
        print(f"  {file.as_posix()}")
    return files


if __name__ == "__main__":
    utils.run_cli(main)
