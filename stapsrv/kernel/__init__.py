"""The kernel store: what the server keeps of each kernel release it
builds for (build trees, ``System.map``, debuginfo, images) and how it
fetches them from the Debian archive. Nothing here knows of requests;
:mod:`stapsrv.compile` builds on it."""
