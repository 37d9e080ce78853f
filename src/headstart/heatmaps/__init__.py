"""Where a model looked: class activation maps of torch networks and heads (cam.py), put back onto each
image at its own size (placement.py), for one model or an ensemble (explain.py), drawn over the image
(overlay.py). `Model.explain` uses them; nothing here knows a Model.

A map says which parts of the image raised the class's score in this model; it is not a proof of why
the model decided so, nor that the object caused the label.
"""
