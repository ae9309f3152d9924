"""``python -m guest_driver`` = ``guest-driver``."""

from guest_driver.cli import main

if __name__ == "__main__":
    main()
