"""`python -m longserve ...`: the same command line as `longserve ...`."""

from longserve.server.cli import main

if __name__ == "__main__":
    main()
