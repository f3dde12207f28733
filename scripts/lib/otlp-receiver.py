#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver for the tests: a reader of OTLP that no one here wrote.

Listens on 127.0.0.1 (an ephemeral port, printed first as "port N"), takes POST /v1/traces with an
ExportTraceServiceRequest (application/x-protobuf, gzip or not), parses it with opentelemetry-proto's own
message classes and prints one JSON object a line per span:
{"service", "name", "kind", "trace_id", "span_id", "parent_span_id", "attributes"}.
Anything it cannot parse is answered 400 and printed as {"error": ...}.
"""
import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def emit(record):
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            if self.path != "/v1/traces":
                raise ValueError("unexpected path " + self.path)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.headers.get("Content-Type") != "application/x-protobuf":
                raise ValueError("unexpected content type " + str(self.headers.get("Content-Type")))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
        except Exception as error:  # report, answer 400, keep serving
            emit({"error": str(error)})
            self.send_response(400)
            self.end_headers()
            return
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    emit({
                        "service": resource.get("service.name"),
                        "name": span.name,
                        "kind": span.kind,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "attributes": {a.key: value(a.value) for a in span.attributes},
                    })
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
print("port", server.server_address[1], flush=True)
server.serve_forever()
