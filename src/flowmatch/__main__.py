"""``python -m flowmatch`` (also ``accelerate launch -m flowmatch train ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
