"""The edit request and the short context templates the tiny-model tests share."""

from __future__ import annotations

from factedit.editing.requests import EditRequest

REQUEST = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome")
# a stand-in for ROME's 21 sampled templates: the bare prompt and two prefixes of different lengths
TEMPLATES = ["{}", "Hello. {}", "The weather today is nice and warm. {}"]
