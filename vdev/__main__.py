from vdev.cli.main import main

main()
