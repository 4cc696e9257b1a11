"""Seconds per meta-iteration of ours vs learn2learn vs a textbook loop; see bilevel_maml/bench.py.

    .venv/bin/python benchmarks/meta_iteration.py --json benchmarks/results/meta_iteration-cpu.json
"""

from bilevel_maml.bench import main

if __name__ == "__main__":
    main()
