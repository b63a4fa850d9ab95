"""A tiny WSGI app for gunicorn that answers the client address it sees (``REMOTE_ADDR``).

Behind ``gunicorn --proxy-protocol`` that address comes from the PROXY header,
so a test can see which client the load balancer said it was relaying.
"""


def app(environ, start_response):
    body = ("%s\n" % environ.get("REMOTE_ADDR", "")).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
