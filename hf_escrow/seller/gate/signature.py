"""The signature Gradio reads off a gated function, and the binding of one call's arguments.

Gradio builds an event's inputs and its API from the wrapper's signature and annotations,
and passes its ``gr.Request`` only to a parameter annotated so. The wrapper therefore shows
the handler's own parameters, plus the spend token field (``fields=True``, optional so API
callers may send the header only) and a request parameter when the handler has none; a
call's arguments are bound back to the handler's own signature.
"""

from __future__ import annotations

import inspect
import typing
from collections import OrderedDict
from typing import Any, Callable, Mapping


class Call:
    """One call of a gated function: the handler's arguments, the caller's token, its price."""

    __slots__ = ("args", "kwargs", "request", "in_gradio", "typed_token", "token", "price")

    def __init__(self) -> None:
        self.token = self.price = None


class GradioSignature:
    """A handler's signature as the wrapper shows it to Gradio, and the binding back to the handler."""

    def __init__(self, fn: Callable, token_field: str | None, gr: Any):
        self.gr = gr
        self.token_field = token_field
        self.signature = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable string annotations: keep none rather than fail
            hints = {}
        # the handler's own request parameter: annotated gr.Request, or simply named `request`
        request_types = (gr.Request, typing.Optional[gr.Request]) if gr is not None else ()
        self.request_name = next((name for name, hint in hints.items()
                                  if name != "return" and hint in request_types), None)
        if self.request_name is None and "request" in self.signature.parameters:
            self.request_name = "request"
        owns_field = token_field is not None and token_field not in self.signature.parameters
        self.owned_field = token_field if owns_field else None

        params = list(self.signature.parameters.values())
        cut = next((i for i, p in enumerate(params) if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
                   len(params))
        # default None: Gradio's API then lists the field as optional, so API callers may send the header only
        added = [inspect.Parameter(self.owned_field, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                   annotation=typing.Optional[str])] if self.owned_field else []
        if self.request_name is None:
            added.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                           annotation=gr.Request if gr is not None else Any))
        wrapper_params = params[:cut] + added + params[cut:]
        self.wrapper_signature = self.signature.replace(parameters=wrapper_params)
        request_param = self.request_name or "request"
        self.call_signature = self.wrapper_signature.replace(
            parameters=[p for p in wrapper_params if p.name != request_param])
        self.annotations = dict(hints)
        if self.owned_field:
            self.annotations[self.owned_field] = typing.Optional[str]
        if gr is not None:
            self.annotations[request_param] = gr.Request

    def apply(self, wrapper: Callable) -> None:
        """Show Gradio the wrapper's own parameters."""
        wrapper.__signature__ = self.wrapper_signature
        wrapper.__annotations__ = self.annotations

    def bind(self, args: tuple, kwargs: dict) -> Call:
        """A call's arguments, as the wrapper got them, bound to the handler's own signature."""
        call = Call()
        args, kwargs = list(args), dict(kwargs)
        request = kwargs.pop(self.request_name or "request", None)
        if request is None and self.gr is not None:
            for i, value in enumerate(args):
                if isinstance(value, self.gr.Request):
                    request = args.pop(i)
                    break
        call.request = request
        call.in_gradio = self.gr is not None and isinstance(request, self.gr.Request)
        bound = self.call_signature.bind(*args, **kwargs)
        typed = bound.arguments.get(self.token_field) if self.token_field else None
        call.typed_token = typed.strip() if isinstance(typed, str) and typed.strip() else None
        arguments = OrderedDict((k, v) for k, v in bound.arguments.items() if k != self.owned_field)
        if self.request_name is not None:
            arguments[self.request_name] = request
        handler_bound = inspect.BoundArguments(self.signature, arguments)
        call.args, call.kwargs = handler_bound.args, handler_bound.kwargs
        return call


def headers_of(request: Any) -> dict[str, str]:
    """Headers from a gr.Request, a starlette Request, or a plain mapping."""
    headers = getattr(request, "headers", request) if request is not None else None
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) or hasattr(headers, "items") else ()
    return {str(k): str(v) for k, v in items}
