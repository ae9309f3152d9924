"""``python -m guest_driver`` = ``guest-driver``."""

from .cli import main

if __name__ == "__main__":
    main()
