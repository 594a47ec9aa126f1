"""`eqk`: equivariant neural tangent kernels from the command line.

Every command turns bad input into one line on stderr naming the file and the problem, exit
status 2; an interrupted run exits 130. Outputs are written atomically.
"""
from __future__ import annotations

import os
import sys

# TensorFlow (pulled in by neural-tangents) is chatty on import; keep the command line quiet. Set here,
# before any command module is imported, rather than on `import eqkernels` (a library sets no environment).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import typer  # noqa: E402

from eqkernels.errors import InputError  # noqa: E402

app = typer.Typer(name="eqk", help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")


def _register() -> None:
    # Sub-apps live in their own modules so each domain can grow without touching the others.
    from eqkernels.apps import histology

    app.add_typer(histology.app, name="histology", help="Histology tiles: train, predict, report.")
    try:
        from eqkernels.apps import molecules
    except ImportError:  # pragma: no cover - during development of the molecules part
        molecules = None
    if molecules is not None:
        app.add_typer(molecules.app, name="molecules", help="Molecules (QM9 and any ASE file): train, predict, report.")
    from eqkernels.apps import demo, kernel

    app.command("demo")(demo.demo)
    app.command("kernel")(kernel.kernel)
    try:
        from eqkernels.apps import compare
    except ImportError:  # pragma: no cover
        compare = None
    if compare is not None:
        app.command("compare")(compare.compare)


_register()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app and maps expected failures to one-line errors."""
    try:
        # Without standalone mode, typer turns Ctrl-C into a returned 130 rather than an exception.
        code = app(args=argv, prog_name="eqk", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            return code
    except InputError as err:
        print(f"eqk: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eqk: interrupted (finished kernel blocks are kept in the checkpoint folder)", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer.Exit inside commands
        return int(e.code or 0)
    except Exception as e:
        # Usage errors (unknown option, bad value) arrive here with standalone_mode=False. typer ≥ 0.16
        # vendors click, so they are recognised by click's exception protocol rather than by class.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show(file=sys.stderr)
            return e.exit_code
        if isinstance(e, typer.Abort):
            print("eqk: aborted", file=sys.stderr)
            return 130
        if os.environ.get("EQK_DEBUG"):
            raise
        print(f"eqk: internal error: {type(e).__name__}: {e} (EQK_DEBUG=1 shows the traceback; finished kernel "
              "blocks are kept in the checkpoint folder)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
