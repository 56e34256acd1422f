"""Win-rate evaluation: the maths (winrate.py: outcomes, bootstrap interval, length-controlled
win-rate) and the report (report.py: report.json, report.md, winrate.png, the console table).
The stage that samples and judges is align/stages/evaluate.py."""
