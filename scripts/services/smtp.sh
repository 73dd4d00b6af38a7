# SMTP sink: aiosmtpd (PyPI, pinned) in a venv under $SERVICES_DIR/smtp,
# listening on CELER_TEST_SMTP_PORT. It accepts every message without TLS
# or authentication and writes each one, as received, to
# $SERVICES_DIR/smtp/inbox/<n>.eml, with the SMTP envelope (MAIL FROM,
# RCPT TO — the only place Bcc recipients appear) beside it in <n>.json.
# Both are written then renamed, so a test never reads half a message.
CELER_TEST_SMTP_AIOSMTPD="aiosmtpd==1.4.6"

smtp_alive() {
  python3 - "$CELER_TEST_SMTP_PORT" <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
banner = s.recv(512)
s.sendall(b"QUIT\r\n")
sys.exit(0 if banner.startswith(b"220") else 1)
PY
}

smtp_up() {
  local dir="$SERVICES_DIR/smtp"
  mkdir -p "$dir/inbox"
  # Tests find their message by a token; old messages only slow the search.
  find "$dir/inbox" -type f -mmin +1440 -delete 2>/dev/null || true
  if smtp_alive; then return 0; fi
  if ! "$dir/venv/bin/python" -c 'import aiosmtpd' >/dev/null 2>&1; then
    echo "services: installing $CELER_TEST_SMTP_AIOSMTPD into $dir/venv" >&2
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install -q "$CELER_TEST_SMTP_AIOSMTPD" >/dev/null
  fi
  cat > "$dir/sink.py" <<'PY'
"""celer's test SMTP sink: every message received is written to the inbox."""
import asyncio, itertools, json, os, sys, time
from aiosmtpd.controller import Controller

port, inbox = int(sys.argv[1]), sys.argv[2]
counter = itertools.count()

def write(path, data):
    tmp = os.path.join(inbox, "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)

class Sink:
    async def handle_DATA(self, server, session, envelope):
        n = "%d-%06d" % (time.time_ns(), next(counter))
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos, "peer": str(session.peer)}
        write(os.path.join(inbox, n + ".json"), json.dumps(meta).encode())
        write(os.path.join(inbox, n + ".eml"), envelope.original_content or envelope.content)
        return "250 Message accepted for delivery"

controller = Controller(Sink(), hostname="127.0.0.1", port=port)
controller.start()
print("smtp sink on 127.0.0.1:%d, inbox %s" % (port, inbox), flush=True)
try:
    asyncio.run(asyncio.Event().wait())
finally:
    controller.stop()
PY
  nohup "$dir/venv/bin/python" "$dir/sink.py" "$CELER_TEST_SMTP_PORT" "$dir/inbox" >"$dir/smtp.log" 2>&1 &
  echo $! >"$dir/smtp.pid"
  for _ in $(seq 1 50); do smtp_alive && return 0; sleep 0.1; done
  echo "services: the SMTP sink did not start; see $dir/smtp.log" >&2; return 1
}

smtp_down() {
  local pidfile="$SERVICES_DIR/smtp/smtp.pid"
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}

smtp_status() {
  if smtp_alive; then
    echo "smtp     up    $CELER_TEST_SMTP_URL  inbox $SERVICES_DIR/smtp/inbox"
  else
    echo "smtp     down"
  fi
}
