"""The OpenAPI document `headstart serve` publishes at /openapi.json: the API as it is.

Written out rather than generated from the handlers' signatures: `POST /predict` and `POST /explain` read
their body themselves
(multipart files under any field name, or one image as the raw body), and the upload limit and the
token are answered in front of FastAPI (app.Guard), so FastAPI alone would describe neither the body
nor the 401 and 413 answers. A client generated from this document works against the server, and
tests/test_serve.py holds the two together: Schemathesis, every check, against a live server.

JSON Schema cannot say "bytes Pillow can decode": a body of the right media type may still be no
image, and the document says so by listing 415 and 422 for it.
"""

from __future__ import annotations

BEARER = "bearer"  # the security scheme's name, when --token is set

ERROR = {
    "type": "object",
    "description": "What is wrong and what to do; `files` names each file of the request that cannot be used.",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string"},
        "files": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "error", "status"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "error": {"type": "string"},
                           "status": {"type": "integer", "enum": [400, 415, 422]}}}},
    },
}

ENGINE = {
    "type": "object",
    "description": "The engine, precision and device that compute the numbers, and why they were chosen.",
    "required": ["engine", "precision", "device", "reason"],
    "properties": {"engine": {"type": "string"}, "precision": {"type": "string"}, "device": {"type": "string"},
                   "reason": {"type": "string"}},
}

MODEL = {
    "type": "object",
    "required": ["source", "backbone", "strategy", "tta", "classes", "image_size", "engine", "metrics", "top_k",
                 "served"],
    "properties": {
        "source": {"type": "string", "description": "the folder name of the run or bundle served"},
        "backbone": {"type": "string"},
        "strategy": {"type": "string"},
        "tta": {"type": "string", "description": "test-time views: none, flip (an ensemble: each member's, +)"},
        "classes": {"type": "array", "items": {"type": "string"}},
        "image_size": {"type": ["integer", "string"], "description": "an ensemble's: each member's, joined by /"},
        "preprocessing": {"type": "object"},
        "members": {"type": "array", "items": {"type": "object"}, "description": "an ensemble's members"},
        "engine": ENGINE,
        "metrics": {"type": ["object", "null"], "description": "the run's validation and test scores; null for a "
                                                               "bare bundle"},
        "top_k": {"type": "integer", "minimum": 1, "description": "classes per image when a request does not say"},
        "served": {"type": "object", "required": ["images", "batches"], "properties": {
            "images": {"type": "integer", "minimum": 0}, "batches": {"type": "integer", "minimum": 0}}},
    },
}


def _json(description: str, schema: dict, **extra) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _error(description: str) -> dict:
    return _json(description, ERROR)


def _answer(classes: list[str]) -> dict:
    prediction = {"type": "object", "required": ["class", "probability"], "additionalProperties": False,
                  "properties": {"class": {"type": "string", "enum": list(classes)},
                                 "probability": {"type": "number", "minimum": 0, "maximum": 1}}}
    result = {"type": "object", "required": ["name", "predictions"], "additionalProperties": False,
              "properties": {"name": {"type": "string"},
                             "predictions": {"type": "array", "minItems": 1, "items": prediction,
                                             "description": "the top_k classes, most probable first"}}}
    return {"type": "object", "required": ["results"], "additionalProperties": False,
            "properties": {"results": {"type": "array", "minItems": 1, "items": result,
                                       "description": "one per image, in the order sent"}}}


def _explained(classes: list[str], map_side: int) -> dict:
    probability = {"type": "number", "minimum": 0, "maximum": 1}
    size = {"type": "integer", "minimum": 1}
    result = {
        "type": "object", "additionalProperties": False,
        "required": ["name", "class", "probability", "predicted", "method", "width", "height", "image_width",
                     "image_height"],
        "properties": {
            "name": {"type": "string"},
            "class": {"type": "string", "enum": list(classes),
                      "description": "the class the map is for: `?class=`, else the predicted one"},
            "probability": probability | {"description": "the model's probability of `class`, as /predict gives it"},
            "predicted": {"type": "object", "required": ["class", "probability"], "additionalProperties": False,
                          "description": "the most probable class, as /predict ranks it first",
                          "properties": {"class": {"type": "string", "enum": list(classes)},
                                         "probability": probability}},
            "method": {"type": "string", "description": "cam (a linear head: exact), grad-cam (any other head), or "
                                                        "an ensemble's `mean of ...` its members' methods"},
            "width": size | {"description": f"the map's width: the image's as decoded, or less to fit {map_side} px"},
            "height": size | {"description": "the map's height, in the image's proportions"},
            "image_width": size | {"description": "the image's width as decoded in full, EXIF orientation applied"},
            "image_height": size,
            "png": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png",
                    "description": "(format png or both) the map as an RGBA PNG of width x height to lay over the "
                                   "image: its positive part in jet colours at half opacity, transparent where "
                                   "the centre crop cut the image away"},
            "map": {"type": "array", "minItems": 1, "description": "(format array or both) the map's values, height "
                                                                   "rows of width, in the head's logit units (5 "
                                                                   "significant digits of the largest); null where "
                                                                   "the centre crop cut the image away",
                    "items": {"type": "array", "minItems": 1, "items": {"type": ["number", "null"]}}},
        },
    }
    return {"type": "object", "required": ["results"], "additionalProperties": False,
            "properties": {"results": {"type": "array", "minItems": 1, "items": result,
                                       "description": "one per image, in the order sent"}}}


def _images_body(max_files: int) -> dict:
    binary = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "description": f"Images as multipart form files (any field name, `file` by convention; up to {max_files}), "
                       "or one image file as the whole body (any other Content-Type; `?name=` names it).",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "array", "items": binary, "minItems": 1, "maxItems": max_files}}},
            },
            "image/*": {"schema": binary},
            "application/octet-stream": {"schema": binary},
        },
    }


def document(*, title: str, version: str, classes: list[str], default_top_k: int, max_files: int,
             max_upload_mb: float | None, secured: bool, map_side: int = 256) -> dict:
    """The OpenAPI 3.1 document of a server of a model with `classes`; `secured`: --token is set; `map_side`: the
    longest side of an /explain map."""
    locked = {"security": [{BEARER: []}]} if secured else {}
    unauthorized = {"401": _error("`--token` is set and the request lacks `Authorization: Bearer <token>`") | {
        "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}}} if secured else {}
    limit = f"{max_upload_mb:g} MB" if max_upload_mb else "the server's --max-upload-mb"
    name = {"name": "name", "in": "query", "required": False,
            "description": "the name to answer with for an image sent as the raw body",
            "schema": {"type": "string", "default": "body"}}

    def on_images(summary: str, operation: str, parameters: list, answer: dict, bad_query: str) -> dict:
        """An operation on uploaded images: /predict's body, limits, token and errors."""
        return {
            "summary": summary,
            "operationId": operation,
            "parameters": [*parameters, name],
            "requestBody": _images_body(max_files),
            "responses": {
                "200": answer,
                "400": _error("No file, an empty file, more than the files allowed, a malformed form or query "
                              f"({bad_query}), or a client that went away mid-request"),
                **unauthorized,
                "413": _error(f"The body is over the upload limit ({limit}): refused from its Content-Length "
                              "before it is read, or as soon as a streamed body passes it"),
                "415": _error("A file that is not an image (a text file, another format)"),
                "422": _error("An image that cannot be used: truncated, corrupt, or too many pixels"),
                "500": _error("The network failed on this request (the server's log has the details)"),
            },
            **locked,
        }

    predict = on_images("Classify images", "predict", [
        {"name": "top_k", "in": "query", "required": False,
         "description": "classes per image, most probable first (more than the model has: all of them)",
         "schema": {"type": "integer", "minimum": 1, "default": default_top_k}},
    ], _json("Each image's top classes", _answer(classes)), "top_k not a whole number of at least 1")
    explain = on_images("Where the model looked", "explain", [
        {"name": "class", "in": "query", "required": False,
         "description": "the class to draw the map of (default: each image's predicted class)",
         "schema": {"type": "string", "enum": list(classes)}},
        {"name": "format", "in": "query", "required": False,
         "description": "the map as a PNG to lay over the image, as numbers, or both",
         "schema": {"type": "string", "enum": ["png", "array", "both"], "default": "png"}},
    ], _json("Each image's class, its probability, and its heatmap (a class activation map: which parts of the "
             "image raised the class's score; not a proof of why)", _explained(classes, map_side)),
        "a class the model does not have, a format other than png, array or both")
    doc = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "A trained image classifier. Errors are JSON: `{\"error\": ..., \"files\": "
                                "[{\"name\", \"error\", \"status\"}]}`."},
        "paths": {
            "/": {"get": {"summary": "The page to try the model in a browser", "operationId": "page",
                          "responses": {"200": {"description": "The page (HTML, with its CSS and JS inline)",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/healthz": {"get": {"summary": "Ready to serve", "operationId": "healthz", "responses": {
                "200": _json("The model is loaded and its engine warmed up", {
                    "type": "object", "required": ["status"], "additionalProperties": False,
                    "properties": {"status": {"const": "ok"}}})}}},
            "/model": {"get": {"summary": "The model served", "operationId": "model", "responses": {
                "200": _json("Classes, backbone, preprocessing, engine, the run's scores, requests served", MODEL),
                **unauthorized}, **locked}},
            "/predict": {"post": predict},
            "/explain": {"post": explain},
        },
    }
    if secured:
        doc["components"] = {"securitySchemes": {BEARER: {"type": "http", "scheme": "bearer"}}}
    return doc
