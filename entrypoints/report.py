"""`report` entry point: a side-by-side report of the tracked runs (see `python entrypoints/report.py --help`)."""

from finetune_lab.cli import command
from finetune_lab.config import ReportConfig

main = command(ReportConfig, "finetune_lab.report:write_report", name="report")

if __name__ == "__main__":
    main()
