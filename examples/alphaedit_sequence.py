"""AlphaEdit batch after batch on the same model, measuring how many earlier edits still hold.

python examples/alphaedit_sequence.py
"""

from factedit import EditRequest, SequentialEditor, load_model

model, tok = load_model()
requests = [
    EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target="Rome", target_true="Paris"),
    EditRequest(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English", target_true="French"
    ),
    EditRequest(prompt="{} is a product of", subject="iPhone", target="Nokia", target_true="Apple"),
    EditRequest(prompt="The capital of {} is", subject="Canada", target="Sydney", target_true="Ottawa"),
]
editor = SequentialEditor(model, tok, "alphaedit", progress=True)
history = editor.run(requests, batch_size=2, after_step=lambda step, done: editor.edits_holding(done))
for record in history:
    print(record)
editor.revert_all()  # bit-exact, from one snapshot of each touched weight
