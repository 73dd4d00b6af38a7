# A Python venv with Django and django-celery-beat, for the
# `celer schedules import --from-django-celery-beat` tests (not a server:
# `up` only installs it; status says whether it is there).
django_venv="$SERVICES_DIR/django-venv"
django_up() {
  if [ -x "$django_venv/bin/python" ] && "$django_venv/bin/python" -c "import django_celery_beat, psycopg" 2>/dev/null; then return 0; fi
  echo "services: creating the django-celery-beat venv" >&2
  python3 -m venv "$django_venv"
  "$django_venv/bin/pip" install -q "django-celery-beat==2.9.0" "psycopg[binary]" >/dev/null
}
django_down() { :; }
django_status() {
  if [ -x "$django_venv/bin/python" ]; then echo "django   ready $django_venv"; else echo "django   absent"; fi
}
