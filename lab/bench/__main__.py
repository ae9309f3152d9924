from lab.bench.cli import main

main()
