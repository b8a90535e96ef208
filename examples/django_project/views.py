"""One page: a form (GET) and its submission (POST), protected by Django's CSRF middleware.

CSRF: the real flow, not ``csrf_exempt``.  The GET renders ``{% csrf_token %}``
(a hidden field) and sets the ``csrftoken`` cookie; the POST must bring both
back, and ``CsrfViewMiddleware`` answers 403 otherwise.  Nothing about the
tunnel changes that: the proxy forwards cookies and the ``Host``/``Origin``
headers unchanged.
"""

from __future__ import annotations

from django import forms
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods


class MessageForm(forms.Form):
    name = forms.CharField(max_length=80)
    message = forms.CharField(max_length=2000, widget=forms.Textarea)


@require_http_methods(["GET", "POST"])
def guestbook(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = MessageForm(request.POST)
        if form.is_valid():
            return render(request, "thanks.html", {"entry": form.cleaned_data,
                                                   "stream": request.META.get("rhttp.stream_id")})
        return render(request, "guestbook.html", {"form": form}, status=400)
    return render(request, "guestbook.html", {"form": MessageForm()})
