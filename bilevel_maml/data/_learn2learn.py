"""learn2learn, imported without gym's "unmaintained" notice.

learn2learn imports gym at import time for its RL environments, which we never use; gym then
prints a multi-line deprecation notice on every start-up that buries the program's own output.
"""

import contextlib
import io


def import_learn2learn():
    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn
    return learn2learn
