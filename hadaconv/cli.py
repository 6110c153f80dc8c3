"""The ``hadaconv`` command line: thin click verbs over the Python API.

Every verb is a call into a public function; user errors (HadaconvError and the usual OS/value
errors about inputs) are printed as one ``error:`` line with exit status 1, never a traceback.
"""

from __future__ import annotations

import sys

import click

from hadaconv._version import __version__
from hadaconv.errors import HadaconvError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="hadaconv")
def cli() -> None:
    """hadaconv: swap the dense attention output projections of trained transformers for fast
    Walsh-Hadamard projections (y = G * H(x)/sqrt(n) + beta), and deploy the result.

    \b
    Pipeline:
      hadaconv inspect MODEL        what would be converted, and the savings
      hadaconv convert MODEL -o DIR fit and swap the projections, save, report
      hadaconv distill DIR -o DIR   win back quality by knowledge distillation
      hadaconv export DIR --onnx    ONNX with the com.hadaconv op (or --portable)
      hadaconv run BUNDLE           generate / embed with ONNX Runtime
    """


@cli.command("hadamard")
@click.argument("n", type=int)
def hadamard_cmd(n: int) -> None:
    """Show how a width N factors into a Hadamard core m and a power of two."""
    from hadaconv.hadamard import factorize

    click.echo(str(factorize(n)))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI and turns user errors into one line and exit code 1."""
    try:
        cli.main(args=argv, prog_name="hadaconv", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (HadaconvError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
