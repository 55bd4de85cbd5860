"""A batch of facts in one MEMIT patch, with the before/after report every front end uses.

python examples/memit_batch.py   # first run computes statistics for 5 layers (minutes on a CPU; cached)
"""

from factedit import EditRequest, edit_and_compare, load_model

model, tok = load_model()
requests = [
    EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target="Rome"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English"),
]
report = edit_and_compare(model, tok, requests, method="memit", progress=True)
print(report.summary_line())
for row in report.rows:
    print(f"{row.text!r}: {row.before['top'][0][0]!r} -> {row.after['top'][0][0]!r}")
for handle in reversed(report.applied):
    handle.revert()
