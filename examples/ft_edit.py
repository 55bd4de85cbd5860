"""The FT-L baseline through the method registry (any registered method works the same way).

python examples/ft_edit.py
"""

from factedit import EditRequest, get_method, load_model, method_names

model, tok = load_model()
print("registered methods:", ", ".join(method_names()))
method = get_method("ft-l")
hparams = method.hparams(model, overrides={"num_steps": 25})  # family defaults, then overrides
request = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target="Rome")
result = method.compute(model, tok, [request], hparams, progress=True)
handle = result.patch.apply(model)
print("converged:", result.converged[0])
handle.revert()
