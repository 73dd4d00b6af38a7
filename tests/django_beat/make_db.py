"""Creates django-celery-beat's tables with Django's own migrations and fills
them as a Django project would, for `celer schedules import`'s tests.

usage: python make_db.py DATABASE  (a SQLite file path, or postgres://…)
"""
import sys
from urllib.parse import urlparse

import django
from django.conf import settings

target = sys.argv[1]
if target.startswith("postgres"):
    u = urlparse(target)
    db = {"ENGINE": "django.db.backends.postgresql", "NAME": u.path.lstrip("/"), "USER": u.username,
          "PASSWORD": u.password, "HOST": u.hostname, "PORT": u.port or 5432}
else:
    db = {"ENGINE": "django.db.backends.sqlite3", "NAME": target}

settings.configure(
    INSTALLED_APPS=["django_celery_beat"],
    DATABASES={"default": db},
    USE_TZ=True,
    TIME_ZONE="UTC",
)
django.setup()

from django.core.management import call_command  # noqa: E402
from django_celery_beat.models import (  # noqa: E402
    ClockedSchedule, CrontabSchedule, IntervalSchedule, PeriodicTask, SolarSchedule,
)
import datetime  # noqa: E402

call_command("migrate", verbosity=0)
# Start from empty tables (the PostgreSQL test database outlives a run).
PeriodicTask.objects.all().delete()
for model in (CrontabSchedule, IntervalSchedule, ClockedSchedule, SolarSchedule):
    model.objects.all().delete()

nightly = CrontabSchedule.objects.create(minute="0", hour="3", day_of_week="*", day_of_month="*",
                                         month_of_year="*", timezone="Europe/London")
PeriodicTask.objects.create(name="clean-mfa", task="modules.auth.accounts.tasks.clean_mfa_data", crontab=nightly,
                            description="nightly MFA cleanup")
weekdays = CrontabSchedule.objects.create(minute="30", hour="9", day_of_week="1-5", day_of_month="*",
                                          month_of_year="*", timezone="America/New_York")
PeriodicTask.objects.create(name="weekday-report", task="hello.greet", crontab=weekdays,
                            kwargs='{"name": "report"}', enabled=False)
five_min = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
PeriodicTask.objects.create(name="complete-ended", task="apps.events.tasks.mark_ended_events_as_completed",
                            interval=five_min, args="[1, 2]", queue="events")
once = ClockedSchedule.objects.create(clocked_time=datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc))
PeriodicTask.objects.create(name="new-year", task="hello.noop", clocked=once, one_off=True)
sunset = SolarSchedule.objects.create(event="sunset", latitude=51.5, longitude=-0.12)
PeriodicTask.objects.create(name="lights", task="hello.noop", solar=sunset)
daily = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.DAYS)
PeriodicTask.objects.create(name="backend-cleanup", task="celery.backend_cleanup", interval=daily)
print("ok")
