"""Cloud Storage's object preconditions and generation headers on top of `gcp-storage-emulator`.

The emulator serves the JSON API but ignores the preconditions Cloud Storage keeps, and its
downloads carry no generation. Our clients rely on both: the run lock creates its file with
`ifGenerationMatch=0` (gcsfs), and tensorstore (orbax's arrays) commits an OCDBT manifest by
compare-and-swap: it reads the manifest (the generation comes from the download's
`x-goog-generation` header), then writes with `ifGenerationMatch=<that generation>`, and reads again
with `ifGenerationNotMatch` to learn whether anything changed. Served without them, two processes
saving one checkpoint failed at random ("Malformed StorageGeneration") and the other process waited
for good. `keep_preconditions` makes the emulator answer as Cloud Storage documents
(https://cloud.google.com/storage/docs/request-preconditions):

- on reads (object metadata and media) of an object that exists: `ifGenerationMatch` /
  `ifMetagenerationMatch` that do not hold -> 412, then `ifGenerationNotMatch` /
  `ifMetagenerationNotMatch` that do not hold -> 304 Not Modified; its media carries
  `x-goog-generation` and `x-goog-metageneration`. A missing object is 404 whatever the conditions;
- on uploads (media and multipart) and deletes: any precondition that does not hold -> 412, checked
  and acted on as one step (the emulator serves one request at a time); for an upload a missing
  object has generation 0, so `ifGenerationMatch=0` means "only if absent".

Resumable uploads are left as they are (gcsfs's file objects use them above their 5 MiB block, its
pipe_file above 50 MB; tensorstore never): none of our conditional writes goes through them.
"""

from http import HTTPStatus

import pytest

_WRITE_FAILED = HTTPStatus.PRECONDITION_FAILED


def keep_preconditions(patch: pytest.MonkeyPatch) -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def stored(storage, bucket, name):
        try:
            return storage.get_file_obj(bucket, name)
        except NotFound:
            return None

    def failed(request, obj, *, read: bool):
        """The status a request's preconditions give against `obj` (None: the object is absent),
        or None if they all hold. Every Match condition is checked before any NotMatch one."""
        values = {"Generation": int(obj["generation"]) if obj else 0,
                  "Metageneration": int(obj["metageneration"]) if obj else 0}
        for key, value in values.items():
            match = request.query.get(f"if{key}Match")
            if match and int(match[0]) != value:
                return _WRITE_FAILED
        for key, value in values.items():
            not_match = request.query.get(f"if{key}NotMatch")
            if not_match and int(not_match[0]) == value:
                return HTTPStatus.NOT_MODIFIED if read else _WRITE_FAILED
        return None

    def refuse(response, status):
        response.status = status
        if status == _WRITE_FAILED:
            message = "At least one of the pre-conditions you specified did not hold."
            response.json({"error": {"code": 412, "message": message,
                                     "errors": [{"reason": "conditionNotMet", "message": message}]}})

    def uploads(upload):
        def conditional(request, response, storage):
            name = request.query["name"][0] if "name" in request.query else request.data["meta"].get("name")
            status = failed(request, stored(storage, request.params["bucket_name"], name), read=False)
            if status is not None:
                return refuse(response, status)
            return upload(request, response, storage)
        return conditional

    def reads(handler):
        def conditional(request, response, storage, *args, **kwargs):
            obj = stored(storage, request.params["bucket_name"], request.params["object_id"])
            status = failed(request, obj, read=True) if obj is not None else None  # (absent: 404)
            if status is not None:
                return refuse(response, status)
            handler(request, response, storage, *args, **kwargs)
            if obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj["metageneration"])
        return conditional

    def deletes(handler):
        def conditional(request, response, storage, *args, **kwargs):
            obj = stored(storage, request.params["bucket_name"], request.params["object_id"])
            if obj is not None:
                status = failed(request, obj, read=False)
                if status is not None:
                    return refuse(response, status)
            return handler(request, response, storage, *args, **kwargs)
        return conditional

    # `insert` looks its upload helpers up at call time; the routes hold the other handlers
    for name in ("_media_upload", "_multipart_upload"):
        patch.setattr(objects, name, uploads(getattr(objects, name)))
    wrap = {objects.get: reads, objects.download: reads, objects.delete: deletes}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in wrap:
                patch.setitem(handlers, method, wrap[handler](handler))
