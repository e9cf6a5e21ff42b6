"""The fleet: boxes sharing frozen state through S3-compatible object storage.

`bucket` is the only module that speaks S3 (through boto3), `store` lays the fleet's objects out
(content-addressed snapshot files plus small pointers that index them), and `uploader` pushes
what this box computes in the background. clawd works the same with the fleet unreachable: the
fleet only ever saves prefill, it never stands between a request and its answer.
"""
