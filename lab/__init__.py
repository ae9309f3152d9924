"""The lab around the product: QEMU, qtest, Linux guests, vdev as a process, demo,
benchmarks and fuzzers."""
