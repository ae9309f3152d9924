from lab.bench.cli import main

main(prog_name="scripts/bench")
