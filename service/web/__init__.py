"""The worklist page: plain HTML, CSS and JavaScript in ``static/``, served by :mod:`service.api.web`.

No build step and nothing from a CDN (hospital networks have no internet; nor do the tests). The page holds
no data: it reads the worklist, results, audit and preview PNG through the API with the bearer token its
user types in (kept in sessionStorage, never in a URL), and polls every few seconds (EventSource cannot send
an Authorization header, so no SSE). It shows what the API returns: accession numbers and study UIDs, never
patient names.
"""
