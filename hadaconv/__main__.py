"""``python -m hadaconv``: the command line, as the ``hadaconv`` script runs it."""

if __name__ == "__main__":  # importing the module (pydoc, a package walk) must not run the CLI
    from hadaconv.cli import main

    main()
