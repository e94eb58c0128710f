"""longserve: a long-context LLM inference server with an OpenAI-compatible API.

One import package: `longserve.server` (the HTTP server and its engines),
`longserve.patches` (the position methods, NBCE and tries, as pure tensor
functions) and `longserve.clients` (load testing and evaluation).

In the source tree those three are top-level folders (server/, patches/,
clients/); the wheel places them inside this package (pyproject.toml's
package-dir). In a checkout, this package's path reaches the checkout's root
too, so `longserve.server` names the same files from a clone, an editable
install and an installed wheel.
"""

from pathlib import Path

_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "server").is_dir() and (_checkout / "server" / "cli.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (a package's __path__)
