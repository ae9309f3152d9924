from vdev.cli import main

main()
