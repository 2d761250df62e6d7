"""The OpenAPI description of /v1, served at /v1/openapi.json.

Written by hand: it is the contract the API keeps (what it accepts, with the
bounds `gateway.services._validate` enforces for every caller), and what the
fuzz tests generate requests from. Built per call because the bounds are
settings.
"""
from __future__ import annotations

from django.conf import settings

from gateway.types import MAX_MODEL_NAME_CHARS, MAX_STOP_CHARS, MAX_STOP_STRINGS, SEED_LIMIT

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}

_MODEL = {
    "type": "object",
    "required": ["id", "object"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                   "owned_by": {"type": "string"}},
}


def _errors(*statuses: int) -> dict:
    reasons = {400: "Bad request", 401: "Missing or wrong API key", 404: "Unknown model or route",
               405: "Wrong method", 413: "Body too large", 429: "Rate limit or quota",
               502: "The model failed while answering", 503: "No model or quota store available"}
    return {str(s): {"description": reasons[s], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for s in statuses}


def _message_schema() -> dict:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    return {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}, {"type": "null"}]},
        },
    }


def _chat_request_schema() -> dict:
    stop_string = {"type": "string", "maxLength": MAX_STOP_CHARS}
    return {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_NAME_CHARS,
                      "description": "a name from /v1/models, or 'auto'"},
            "messages": {"type": "array", "minItems": 1, "maxItems": settings.GATEWAY_MAX_MESSAGES,
                         "items": _message_schema(),
                         "description": f"at most {settings.GATEWAY_MAX_REQUEST_CHARS} characters in all"},
            "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": settings.GATEWAY_MAX_TOKENS},
            "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1,
                                      "maximum": settings.GATEWAY_MAX_TOKENS},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": SEED_LIMIT - 1},
            "stop": {"oneOf": [stop_string, {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": stop_string},
                               {"type": "null"}]},
            "n": {"enum": [1, None]},
            "stream": {"type": ["boolean", "null"]},
            "stream_options": {"type": ["object", "null"],
                               "properties": {"include_usage": {"type": "boolean"}}},
        },
    }


def _chat_completions() -> dict:
    return {"post": {
        "operationId": "createChatCompletion",
        "summary": "A chat completion, streamed (text/event-stream) or whole",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _chat_request_schema()}}},
        "responses": {
            "200": {"description": "The completion (or its SSE chunks when stream is true)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 401, 404, 413, 429, 502, 503),
        },
    }}


def _moderations() -> dict:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    text_input = {"oneOf": [{"type": "string"}, text_part]}
    body = {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": {"oneOf": [{"type": "string"},
                                {"type": "array", "minItems": 1, "maxItems": settings.GATEWAY_MAX_MESSAGES,
                                 "items": text_input}],
                      "description": f"at most {settings.GATEWAY_MAX_REQUEST_CHARS} characters in all"},
            "model": {"type": ["string", "null"], "description": "ignored: the deployment's pipeline answers"},
        },
    }
    result = {"type": "object", "required": ["flagged", "categories", "category_scores"],
              "properties": {"flagged": {"type": "boolean"}, "categories": {"type": "object"},
                             "category_scores": {"type": "object"}}}
    response = {"type": "object", "required": ["id", "model", "results"],
                "properties": {"id": {"type": "string"}, "model": {"type": "string"},
                               "results": {"type": "array", "items": result}}}
    return {"post": {
        "operationId": "createModeration",
        "summary": "Classify texts with the moderation pipeline every prompt passes (OpenAI's format)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {"description": "One result per input", "content": {"application/json": {"schema": response}}},
            **_errors(400, 401, 405, 413, 429, 503),
        },
    }}


def _models() -> dict:
    listing = {"type": "object", "required": ["object", "data"],
               "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}}
    return {"get": {
        "operationId": "listModels",
        "summary": "The models this key's user may use",
        "responses": {"200": {"description": "The models", "content": {"application/json": {"schema": listing}}},
                      **_errors(401, 429, 503)},
    }}


def _model() -> dict:
    return {"get": {
        "operationId": "retrieveModel",
        "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The model", "content": {"application/json": {"schema": _MODEL}}},
                      **_errors(401, 404, 429, 503)},
    }}


def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Chat: OpenAI-compatible API", "version": "1"},
        "servers": [{"url": "/v1"}],
        "security": [{"bearer": []}],
        "paths": {"/chat/completions": _chat_completions(), "/moderations": _moderations(), "/models": _models(),
                  "/models/{model_id}": _model()},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "an API key (sk-chat-...) from Settings → API keys"}},
            "schemas": {"Error": _ERROR},
        },
    }
