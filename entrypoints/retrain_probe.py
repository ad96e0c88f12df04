"""`retrain_probe` entry point: does one new example change the model?

See `python entrypoints/retrain_probe.py --help`.
"""

from finetune_lab.cli import command
from finetune_lab.config import ProbeConfig

main = command(ProbeConfig, "finetune_lab.probe:run", name="retrain_probe")

if __name__ == "__main__":
    main()
