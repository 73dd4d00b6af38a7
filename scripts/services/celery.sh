# Celery 5.7 client (not a server): a Python venv with celery[redis] and
# redis-py, for the Celery drop-in tests (tests/celery/*.py) and the
# benchmark's Celery side. `up` creates/updates it; idempotent.
celery_venv="$SERVICES_DIR/celery-venv"
celery_up() {
  local req="$root/tests/celery/requirements.txt" stamp="$celery_venv/.requirements"
  if [ -x "$celery_venv/bin/python" ] && cmp -s "$req" "$stamp"; then return 0; fi
  echo "services: installing the Celery client venv ($celery_venv)" >&2
  [ -x "$celery_venv/bin/python" ] || python3 -m venv "$celery_venv"
  "$celery_venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  cp "$req" "$stamp"
}
celery_down() { :; }
celery_status() {
  if [ -x "$celery_venv/bin/celery" ]; then echo "celery   ready $celery_venv"; else echo "celery   missing"; fi
}
